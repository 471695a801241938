"""``ctc``: speech recognition with a CTC output layer over a speech encoder (wav2vec2, HuBERT, WavLM).

The output layer matches the target vocabulary (built from the training transcripts when the checkpoint
has none); evaluation decodes greedily (repeats merged, blanks dropped) and scores WER and CER.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.tasks.audio import AsrTask

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


class Ctc(AsrTask):
    """A clip -> its transcript, one character (or token) per frame."""

    name = "ctc"
    auto_class = "AutoModelForCTC"
    architectures = "MODEL_FOR_CTC_MAPPING_NAMES"
    head_modules = ("lm_head",)

    def kept_head_misfit(self, own_tokenizer: bool) -> str | None:
        """The output layer predicts the checkpoint tokenizer's ids: another target tokenizer needs a new one."""
        if own_tokenizer:
            return None
        return "the targets use another tokenizer (model.tokenizer) than the one its output layer was trained on"

    def decode_references(self, labels: Any, tokenizer: Any) -> list[str]:
        """Reference transcripts from label ids, repeated letters kept (a character vocabulary's "ll" is two labels,
        not a CTC repeat to merge)."""
        from engine.evaluation.asr import decode_references

        return decode_references(labels, tokenizer, True)

    def settle_target_tokenizer(self, job: JobSpec, transcripts: Callable[[], list[str]], out_dir: Any) -> JobSpec:
        """Without a tokenizer in the checkpoint (a pre-trained encoder only) or ``model.tokenizer``, a character
        vocabulary is built from the training transcripts into ``out_dir``."""
        from engine.models.speech import build_ctc_vocab, has_tokenizer

        model = job.model
        if model.tokenizer or has_tokenizer(model.name):
            return job
        folder = build_ctc_vocab([t for t in transcripts() if t], out_dir)
        return job.model_copy(update={"model": model.model_copy(update={"tokenizer": str(folder)})})

    def config_overrides(self, job: JobSpec, config: Any) -> dict[str, Any]:
        """The output layer matches the target vocabulary (its size, blank = pad id), mean loss reduction and
        infinite losses zeroed (clips shorter than their transcript); then SpecAugment's setting."""
        tokenizer = self.target_tokenizer(job)
        overrides: dict[str, Any] = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, ctc_loss_reduction="mean", ctc_zero_infinity=True)
        return {**overrides, **super().config_overrides(job, config)}

    def pad_token_id(self, tokenizer: Any) -> int | None:
        """The target tokenizer's pad id: CTC's blank."""
        return tokenizer.pad_token_id

    def predictions(self, model: Any, tokenizer: Any, job: JobSpec, amp_dtype: Any) -> Callable[[Any, dict[str, Any]], list[str]]:
        """Greedy CTC decoding of the logits."""
        from engine.evaluation.asr import decode_ctc

        return lambda outputs, batch: decode_ctc(outputs.logits, tokenizer)


TASK = Ctc()
