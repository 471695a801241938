"""``speech_seq2seq``: speech recognition with an encoder-decoder (Whisper) that keeps its LM head.

Transcripts get the checkpoint's language and task tokens; evaluation generates them (greedy) and
scores WER and CER; ``finetune.freeze_depth`` counts the encoder's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.errors import JobError
from engine.tasks.audio import AsrTask

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


class SpeechSeq2Seq(AsrTask):
    """A clip -> its transcript, written by a decoder."""

    name = "speech_seq2seq"
    auto_class = "AutoModelForSpeechSeq2Seq"
    architectures = "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"
    freeze_stack = "encoder"

    def check_settings(self, job: JobSpec) -> None:
        """``freeze_depth: all`` would freeze the decoder too: nothing would train."""
        if job.finetune.freeze_depth == "all":
            raise JobError(
                "finetune.freeze_depth is 'all' for speech_seq2seq: it counts the encoder's blocks, and with all of them frozen "
                "the decoder above them freezes too, so nothing would train. Use a negative depth (e.g. -2) or 0 with peft.method: lora."
            )

    def decoder_start_token_id(self, source: str, job: JobSpec) -> int | None:
        """The checkpoint config's ``decoder_start_token_id``."""
        from engine.models.loading import read_config_json

        return read_config_json(source, job.model.revision).get("decoder_start_token_id")

    def predictions(self, model: Any, tokenizer: Any, job: JobSpec, amp_dtype: Any) -> Callable[[Any, dict[str, Any]], list[str]]:
        """Greedy generation with the job's language and task tokens."""
        from engine.evaluation.asr import generate_transcripts

        return lambda outputs, batch: generate_transcripts(model, batch, tokenizer, job, amp_dtype)


TASK = SpeechSeq2Seq()
