"""``causal_lm``: next-token prediction on plain text, prompt/completion or chat rows (answers only as labels)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.tasks.text import TextTask

if TYPE_CHECKING:
    from engine.config.schema import JobSpec


class CausalLM(TextTask):
    """A decoder keeps its LM head and objective: loss and perplexity; exact match and ROUGE-L on generated answers."""

    name = "causal_lm"
    auto_class = "AutoModelForCausalLM"
    architectures = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    metrics = ("loss", "perplexity", "exact_match", "rougeL")  # the last two with data.layout prompt_completion or chat
    layouts = ("text", "prompt_completion", "chat")
    next_token_loss = True
    answers_prompts = True
    peft_task_type = "CAUSAL_LM"

    def check_job(self, job: JobSpec) -> None:
        """No classes: ``model.labels`` must be empty."""
        super().check_job(job)
        if job.model.labels:
            raise ValueError("model.labels is set but model.task is 'causal_lm', which has no classes: remove model.labels")


TASK = CausalLM()
