"""``seq2seq``: text-to-text (T5, BART, mT5). The worked example of adding a task (see the README).

The prompt column feeds the encoder and the completion column is the decoder's target
(``engine.preprocessing.seq2seq.encode_pairs``); the model keeps its LM head; evaluation reports the loss and greedy
answers scored by exact match and ROUGE-L (``engine.evaluation.generation``); ``finetune.freeze_depth`` counts the
encoder's blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.tasks.text import TextTask

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


class Seq2Seq(TextTask):
    """Source text -> target text with an encoder-decoder."""

    name = "seq2seq"
    auto_class = "AutoModelForSeq2SeqLM"
    architectures = "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"
    metrics = ("loss", "exact_match", "rougeL")
    layouts = ("prompt_completion",)
    answers_prompts = True
    encoder_decoder_text = True
    freeze_stack = "encoder"
    peft_task_type = "SEQ_2_SEQ_LM"

    def forgetting_measure(self, job: JobSpec) -> str | None:
        """None: an encoder-decoder has neither the LM loss nor the pooled hidden states the measures use."""
        return None

    def check_job(self, job: JobSpec) -> None:
        """Source and target columns: ``data.layout`` must be prompt_completion."""
        super().check_job(job)
        if job.data.layout != "prompt_completion":
            raise ValueError("model.task seq2seq reads a source and a target column: set data.layout: prompt_completion (data.prompt_column, data.completion_column)")


TASK = Seq2Seq()
