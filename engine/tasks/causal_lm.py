"""``causal_lm``: next-token prediction on plain text, prompt/completion or chat rows (answers only as labels)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.tasks.text import TextTask

if TYPE_CHECKING:
    from engine.config.schema import JobSpec

ENCODER_ONLY = {
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "data2vec-text",
    "roberta-prelayernorm", "xmod", "megatron-bert", "rembert", "big_bird", "modernbert", "distilbert", "albert", "deberta", "deberta-v2",
}
"""Encoder architectures that transformers can wrap in a causal-LM head (``BertLMHeadModel``), which only
makes sense for a checkpoint trained as a decoder (``is_decoder: true``)."""


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

    def check_architecture(self, config: dict[str, Any], name: str) -> None:
        """A causal LM starts from a decoder: an encoder-only checkpoint (no ``is_decoder``) was never trained to
        predict the next token."""
        from engine.errors import JobError

        if config.get("model_type") in ENCODER_ONLY and not config.get("is_decoder"):
            raise JobError(
                f"model.name '{name}' is an encoder-only '{config['model_type']}' model (no is_decoder in its config): it was not "
                f"trained to predict the next token, so model.task '{self.name}' would start from an untrained language model. "
                "Use a decoder model (GPT-2, Llama, Qwen2, ...) or model.task: sequence_classification."
            )

    def forgetting_measure(self, job: JobSpec) -> str | None:
        """``lm_loss``: the model keeps its LM head, so the retention set's LM loss is measured directly."""
        return "lm_loss"

    def packs_rows(self, job: JobSpec) -> bool:
        """``perf.packing``: rows packed into full-length sequences, attention kept within each row."""
        return bool(job.perf.packing)

    def groups_by_length(self, job: JobSpec) -> bool:
        """Never: packing fills every sequence instead."""
        return False

    def check_job(self, job: JobSpec) -> None:
        """No classes: ``model.labels`` must be empty."""
        super().check_job(job)
        if job.model.labels:
            raise ValueError("model.labels is set but model.task is 'causal_lm', which has no classes: remove model.labels")


TASK = CausalLM()
