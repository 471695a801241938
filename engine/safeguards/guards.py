"""Transfer safeguards: negative transfer, catastrophic forgetting, overfitting, gradual unfreezing.

- *Negative transfer*: ``engine.safeguards.transfer`` (re-exported here): the fair from-scratch twin
  (:func:`scratch_job`) and the verdicts against it and against chance (:func:`judge_transfer`).
- *Forgetting*: :class:`RetentionProbe` measures a retention set at step 0 and at every evaluation, with the
  source objective where the model has it (causal-LM loss with the LM head; masked-LM loss through the
  checkpoint's own masked-LM head, kept aside, for an encoder saved with one) or else representation drift
  (1 - linear CKA of mean-pooled last hidden states against the step-0, i.e. pre-trained, features). On
  ``safeguards.retention_data`` (text like the source, apart from the task) that is ``forgetting``, and a
  second probe on a few of the target's validation rows reports ``drift`` (CKA) beside it; without
  retention data the probe runs on the target's rows and only ``drift`` is reported: the model moving, not
  losing the source.
- *Overfitting*: the train/validation loss gap, dropout and token-dropout augmentation.
- *Gradual unfreezing*: :class:`GradualUnfreezer` unfreezes one more block from the top every k steps.

:class:`Safeguards` bundles them for ``engine.loop``: one call before the loop, one per optimizer step
(unfreezing, through the loop's ``GradualUnfreezing`` hook), one per evaluation. No Ray here; re-wrapping
the model after unfreezing is the loop's job.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from engine.config.schema import JobSpec
from engine.models.blocks import BlockStack
from engine.models.surgery import freeze_bottom_blocks
from engine.safeguards.transfer import (  # noqa: F401  (re-exported: the safeguards' public home)
    Baselines, TransferVerdict, class_baselines, judge_transfer, scratch_job, transfer_verdict,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Forgetting


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two (examples x features) matrices (Kornblith et al., 2019).

    1 for representations equal up to rotation and isotropic scaling, towards 0 for unrelated ones.
    """
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norms) if norms > 0 else 0.0


DRIFT_ROWS = 32
"""Target validation rows of the drift probe that runs beside the retention set: a fixed handful, measured
only at evaluations, so the second measure costs a forward pass of 32 rows."""

MASK_SHARE = 0.15
"""Share of each retention text's tokens (special tokens never) masked for the masked-LM loss, as in BERT."""


def forgetting_measure(job: JobSpec) -> str:
    """``lm_loss`` for a causal LM (it keeps its LM head), ``mlm_loss`` for a checkpoint saved with a
    masked-LM head (``architectures`` in its config name a ``*ForMaskedLM``), else ``cka``."""
    chosen = job.safeguards.forgetting_measure
    if chosen != "auto":
        return chosen
    from engine.tasks import get_task

    return get_task(job.model.task).forgetting_measure(job) or "cka"


class RetentionProbe:
    """A fixed retention set, measured at step 0 (the pre-trained model) and at every evaluation.

    ``delta`` is the forgetting: LM-loss increase in nats (``lm_loss``; ``mlm_loss`` scores a fixed 15% of
    the tokens, masked, with the checkpoint's masked-LM ``head`` on the model's last hidden states) or
    ``1 - CKA`` against the step-0 features (``cka``); 0 at step 0, rising as the model drifts from what it
    was pre-trained to do.
    """

    def __init__(self, texts: list[str], tokenizer: Any, measure: str, max_length: int, device: torch.device,
                 batch_size: int = 16, head: nn.Module | None = None, seed: int = 0):
        if measure == "mlm_loss" and (head is None or tokenizer.mask_token_id is None):
            raise ValueError("the mlm_loss measure needs the checkpoint's masked-LM head and a tokenizer with a mask token")
        # Texts sorted by length and padded per batch: a fixed order, and little padding to compute.
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        ordered = [texts[i] for i in sorted(range(len(texts)), key=lambda i: (lengths[i], i))]
        self.batches = []
        for start in range(0, len(ordered), batch_size):
            encoded = tokenizer(ordered[start:start + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            self.batches.append({k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        if measure == "mlm_loss":
            generator = torch.Generator().manual_seed(seed)
            self.batches = [mask_tokens(b, tokenizer, generator) for b in self.batches]
        self.head = head.to(device) if head is not None else None
        self.measure = measure
        self.device = device
        self.reference: torch.Tensor | float | None = None

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield {k: v.to(self.device) for k, v in batch.items()}

    def _autocast(self):
        """Mixed precision on GPUs, as in training (frozen weights may be kept in bf16 or FP8 there)."""
        if self.device.type != "cuda":
            return nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    @torch.no_grad()
    def _measure(self, model: nn.Module) -> torch.Tensor | float:
        was_training = model.training
        model.eval()
        try:
            with self._autocast():
                return self._forward(model)
        finally:
            model.train(was_training)

    def _forward(self, model: nn.Module) -> torch.Tensor | float:
        """LM loss on the retention set, or its mean-pooled last hidden states (for CKA)."""
        if self.measure == "lm_loss":
            total, tokens = 0.0, 0
            for batch in self._batches():
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                out = model(**batch, labels=labels)
                count = int((labels[:, 1:] != -100).sum())
                total, tokens = total + float(out.loss) * count, tokens + count
            return total / max(tokens, 1)
        if self.measure == "mlm_loss":
            total, tokens = 0.0, 0
            for batch in self._batches():
                labels = batch.pop("labels")
                hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
                logits = self.head(hidden).float()
                total += float(nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"))
                tokens += int((labels != -100).sum())
            return total / max(tokens, 1)
        pooled = []
        for batch in self._batches():
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        return torch.cat(pooled).cpu()

    def start(self, model: nn.Module) -> None:
        """Measure the pre-trained model (step 0)."""
        self.reference = self._measure(model)

    def delta(self, model: nn.Module) -> dict[str, float]:
        """Forgetting since step 0, with the raw retention value."""
        now = self._measure(model)
        if self.measure in ("lm_loss", "mlm_loss"):
            return {"forgetting": now - self.reference, "retention_loss": now, "retention_loss_start": self.reference}
        cka = linear_cka(self.reference, now)
        return {"forgetting": 1.0 - cka, "retention_cka": cka}


def mask_tokens(batch: dict[str, torch.Tensor], tokenizer: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch with a fixed ``MASK_SHARE`` of its real, non-special tokens (at least one a row) replaced
    by the mask token, and ``labels`` holding the original ids there (-100 elsewhere)."""
    ids = batch["input_ids"]
    special = torch.isin(ids, torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype))
    candidates = (batch["attention_mask"] == 1) & ~special
    scores = torch.rand(ids.shape, generator=generator).masked_fill(~candidates, 2.0)
    per_row = (candidates.sum(1).float() * MASK_SHARE).ceil().long().clamp(min=1)
    ranks = scores.argsort(1).argsort(1)
    chosen = (ranks < per_row.unsqueeze(1)) & candidates
    return {**batch, "input_ids": ids.masked_fill(chosen, tokenizer.mask_token_id), "labels": ids.masked_fill(~chosen, -100)}


# ---------------------------------------------------------------------------------------------------
# Gradual unfreezing


class GradualUnfreezer:
    """ULMFiT-style schedule: from ``start_frozen`` frozen blocks, one more block unfreezes from the top
    every ``every`` optimizer steps, down to none (then the embeddings unfreeze with the last block)."""

    def __init__(self, stack: BlockStack, head_names: list[str], start_frozen: int, every: int, freeze_embeddings: bool | None = None):
        self.stack, self.head_names, self.start_frozen, self.every = stack, head_names, start_frozen, every
        self.freeze_embeddings = freeze_embeddings
        self.current = start_frozen

    def frozen_at(self, step: int) -> int:
        """Blocks frozen at optimizer step ``step``."""
        return max(self.start_frozen - step // self.every, 0)

    def due(self, step: int) -> bool:
        """Whether the frozen depth changes at ``step``."""
        return self.frozen_at(step) != self.current

    def apply(self, model: nn.Module, step: int) -> nn.Module:
        """Set ``requires_grad`` for the depth at ``step`` on the unwrapped model."""
        self.current = self.frozen_at(step)
        freeze_bottom_blocks(model, self.stack, self.current, self.head_names, self.freeze_embeddings)
        log.info("gradual unfreezing: step %d, %d of %d blocks frozen", step, self.current, self.stack.depth)
        return model

    @contextmanager
    def all_unfrozen(self, model: nn.Module) -> Iterator[None]:
        """Everything the schedule will ever unfreeze is trainable inside the block (to build the optimizer's
        parameter groups once, so unfrozen blocks join the backbone group at its LR); frozen again after."""
        freeze_bottom_blocks(model, self.stack, 0, self.head_names, self.freeze_embeddings)
        try:
            yield
        finally:
            freeze_bottom_blocks(model, self.stack, self.current, self.head_names, self.freeze_embeddings)


# ---------------------------------------------------------------------------------------------------
# The bundle the loop calls


def set_dropout(model: nn.Module, rate: float) -> int:
    """Set every ``nn.Dropout`` of ``model`` to ``rate``; returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
            count += 1
    return count


def token_dropout(batch: dict[str, torch.Tensor], rate: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Hide a random share ``rate`` of the tokens (never the first) from attention: text augmentation."""
    mask = batch.get("attention_mask")
    if not rate or mask is None:
        return batch
    drop = torch.rand(mask.shape, generator=generator) < rate
    drop[:, 0] = False
    return {**batch, "attention_mask": mask.masked_fill(drop.to(mask.device), 0)}


class Safeguards:
    """What the training loop calls: ``start`` before the loop, ``unfreeze_due``/``unfreeze`` at each
    optimizer step, ``augment`` on each training batch, ``on_eval`` at each evaluation."""

    def __init__(self, job: JobSpec, model: nn.Module, stack: BlockStack, n_frozen: int, head_names: list[str], steps_per_epoch: int):
        spec = job.safeguards
        self.job = job
        self.probe: RetentionProbe | None = None
        self.drift_probe: RetentionProbe | None = None  # target rows beside the retention set (drift, CKA)
        self.stop_reason: str | None = None
        self.generator = torch.Generator().manual_seed(job.seed)
        every = spec.unfreeze_every_steps or (spec.unfreeze_every_epochs or 0) * steps_per_epoch
        self.unfreezer = GradualUnfreezer(stack, head_names, n_frozen, every, job.finetune.freeze_embeddings) if every and n_frozen else None
        if spec.dropout is not None:
            log.info("dropout set to %.3g in %d layers", spec.dropout, set_dropout(model, spec.dropout))

    def param_groups_scope(self, model: nn.Module):
        """Context in which to build parameter groups: with gradual unfreezing, every block it will unfreeze."""
        return self.unfreezer.all_unfrozen(model) if self.unfreezer else _nothing()

    def start(self, model: nn.Module, retention_texts: list[str] | None, tokenizer: Any, device: torch.device,
              drift_texts: list[str] | None = None) -> None:
        """Measure the retention set (and the drift rows of the target, :func:`read_drift_texts`) on the
        pre-trained model (call before any training step or resume)."""
        if not self.job.safeguards.track_forgetting:
            return
        max_length = self.job.data.max_length
        if retention_texts:  # the target's own rows without retention_data: drift, always as CKA
            measure = forgetting_measure(self.job) if self.job.safeguards.retention_data else "cka"
            head = None
            if measure == "mlm_loss":
                from engine.models.loading import load_masked_lm_head

                head = load_masked_lm_head(self.job.model.name, self.job.model.revision) if tokenizer.mask_token_id is not None else None
                if head is None:
                    log.warning("no masked-LM head or mask token: forgetting measured as cka (representation drift) instead")
                    measure, head = "cka", None
            self.probe = RetentionProbe(retention_texts, tokenizer, measure, max_length, device, head=head, seed=self.job.seed)
            self.probe.start(model)
            log.info("retention set: %d texts, %s measured as %s", len(retention_texts), drift_or_forgetting(self.job), measure)
        if drift_texts and self.job.safeguards.retention_data:
            self.drift_probe = RetentionProbe(drift_texts, tokenizer, "cka", max_length, device)
            self.drift_probe.start(model)
            log.info("drift on target data: %d validation rows, measured as cka", len(drift_texts))

    def unfreeze_due(self, step: int) -> bool:
        return bool(self.unfreezer and self.unfreezer.due(step))

    def unfreeze(self, model: nn.Module, step: int) -> nn.Module:
        """Apply the unfreezing schedule at ``step`` to the unwrapped model (the loop re-wraps it)."""
        return self.unfreezer.apply(model, step)

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return token_dropout(batch, self.job.safeguards.token_dropout, self.generator)

    def on_eval(self, model: nn.Module, metrics: dict[str, Any]) -> dict[str, float]:
        """Safeguard metrics for this evaluation; sets ``stop_reason`` when forgetting passes its limit."""
        out: dict[str, float] = {}
        if "val_loss" in metrics and "train_loss" in metrics:
            out["train_val_gap"] = metrics["val_loss"] - metrics["train_loss"]
        if self.unfreezer:
            out["frozen_blocks"] = self.unfreezer.current
        out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.probe:
            out.update(self.probe.delta(model))
            name = drift_or_forgetting(self.job)
            if name == "drift":  # measured on the target's own rows: representation drift, not forgetting
                out["drift"] = out.pop("forgetting")
            if self.drift_probe:  # the second measure: how far the model moved on the target's own rows
                out["drift"] = self.drift_probe.delta(model)["forgetting"]
            limit = self.job.safeguards.max_forgetting
            if limit is not None and out[name] > limit:
                self.stop_reason = f"{name} {out[name]:.4f} exceeded safeguards.max_forgetting {limit}"
        return out


def drift_or_forgetting(job: JobSpec) -> str:
    """What the retention probe measures: ``forgetting`` of the source on ``safeguards.retention_data``
    (source-like text apart from the task), or ``drift`` when it falls back to the target's own rows."""
    return "forgetting" if job.safeguards.retention_data else "drift"


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def read_drift_texts(job: JobSpec, split_files: dict[str, tuple[list[str], str]]) -> list[str] | None:
    """The first ``DRIFT_ROWS`` validation (else training) texts, for the drift measure beside a retention
    set; None without ``safeguards.retention_data`` (the retention probe then runs on these rows itself)."""
    spec = job.safeguards
    if not (spec.track_forgetting and spec.retention_data):
        return None
    from engine.preprocessing.chat import layout_columns, retention_text
    from engine.tasks import get_task

    if get_task(job.model.task).forgetting_measure(job) is None:  # e.g. seq2seq: no retention measure applies
        return None
    columns = layout_columns(job.data)
    column = columns.get("text") or columns.get("prompt") or columns["messages"]
    name = "validation" if "validation" in split_files else "train"
    files, fmt = split_files[name]
    from engine.preprocessing.datafiles import open_files  # Hugging Face datasets' Arrow stream files too

    table = open_files(files, fmt).head(DRIFT_ROWS, columns=[column])
    return [retention_text(t) for t in table.column(0).to_pylist()]


def read_retention_texts(job: JobSpec, split_files: dict[str, tuple[list[str], str]]) -> list[str] | None:
    """The retention texts: ``safeguards.retention_data``, else the first validation (or training) rows.

    Args:
        split_files: split name -> (files, pyarrow format) as the preflight found them.
    """
    spec = job.safeguards
    if not spec.track_forgetting:
        return None
    from engine.preprocessing.datafiles import open_files  # Hugging Face datasets' Arrow stream files too

    if spec.retention_data:
        from pathlib import Path

        path = Path(spec.retention_data).expanduser()
        if not path.exists():
            from engine.errors import JobError

            raise JobError(f"safeguards.retention_data: '{path}' does not exist. Give a parquet/jsonl/csv file or folder of text.")
        fmt = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(path.suffix.lower(), "parquet")
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [str(path)]
    else:
        name = "validation" if "validation" in split_files else "train"
        files, fmt = split_files[name]
    from engine.preprocessing.chat import retention_column, retention_text
    from engine.tasks import get_task

    if get_task(job.model.task).forgetting_measure(job) is None:  # e.g. seq2seq: no retention measure applies
        return None
    column = retention_column(job)  # the text column, or instruction data's prompts / chats
    table = open_files(files, fmt).head(spec.retention_rows, columns=[column])
    return [retention_text(t) for t in table.column(0).to_pylist()]
