"""Loading a pre-trained model for a task through the Hugging Face Auto classes.

This is the only module that loads weights. A hub id and a local folder take exactly the same path.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import JobError

if TYPE_CHECKING:
    from engine.tasks.base import Task

log = logging.getLogger(__name__)

def load_config(name: str, revision: str | None = None) -> Any:
    """Load a model's ``transformers`` config, turning 'not a model' into a :class:`JobError`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise JobError(not_a_model_message(name, exc)) from None


def not_a_model_message(name: str, exc: Exception) -> str:
    return (
        f"model.name '{name}' is not a model: {str(exc).splitlines()[0]} "
        "Give a Hugging Face hub id (org/model) or a folder written by save_pretrained (with config.json)."
    )


def read_config_json(name: str, revision: str | None = None) -> dict[str, Any]:
    """A model's ``config.json`` as a dict, from its folder or the hub, without importing torch."""
    path = Path(name).expanduser() / "config.json"
    try:
        if not path.parent.is_dir():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, "config.json", revision=revision))
        return json.loads(path.read_text())
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        raise JobError(not_a_model_message(name, exc)) from None


@functools.lru_cache(maxsize=None)
def supported_model_types(task: Task) -> tuple[str, ...]:
    """Architectures (``model_type``) that can do ``task``, from ``transformers``' Auto tables.

    Importing ``transformers.models.auto.modeling_auto`` imports torch (through the config classes), so
    the table, a literal in that module, is read from its source; the import is the fallback.
    """
    import ast
    import importlib.util

    table = task.architectures
    spec = importlib.util.find_spec("transformers.models.auto.modeling_auto")
    try:
        tree = ast.parse(Path(spec.origin).read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == table for t in node.targets):
                return tuple(pair.elts[0].value for pair in node.value.args[0].elts)
    except (AttributeError, IndexError, OSError, SyntaxError, TypeError):
        pass
    from transformers.models.auto import modeling_auto

    return tuple(getattr(modeling_auto, table))


def load_tokenizer(name: str, revision: str | None = None) -> Any:
    """The checkpoint's own tokenizer, with a pad token (EOS) when it has none, padding on the right."""
    from transformers import AutoTokenizer

    from engine.checkpoints.storage import preprocessing_source

    tokenizer = AutoTokenizer.from_pretrained(preprocessing_source(name), revision=revision)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_pretrained(
    name: str,
    task: Task,
    labels: list[str] | None = None,
    *,
    revision: str | None = None,
    from_scratch: bool = False,
    pad_token_id: int | None = None,
    config_overrides: Callable[[Any], dict[str, Any]] | None = None,
) -> tuple[Any, set[str]]:
    """Load ``name`` with the head for ``task``.

    Args:
        name: hub id or local folder.
        task: the job's task (its ``auto_class``).
        labels: class names for classification tasks.
        revision: hub revision.
        from_scratch: build the architecture from its config with random weights.
        pad_token_id: the tokenizer's pad id, needed by decoder classifiers to find the last token.
        config_overrides: the config attributes to set before building, given the checkpoint's config (the task's ``config_overrides``).

    Returns:
        The model, and the names of its parameters that did not come from the checkpoint (missing there or
        of another shape, so freshly initialised; all of them with ``from_scratch``).
    """
    import transformers

    auto_class = getattr(transformers, task.auto_class)
    kwargs: dict[str, Any] = {}
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    config = load_config(name, revision)
    for key, value in kwargs.items():
        setattr(config, key, value)
    if pad_token_id is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id
    for key, value in (config_overrides(config) if config_overrides else {}).items():
        setattr(config, key, value)
    if from_scratch:
        model = auto_class.from_config(config)
        log.info("built %s from its config with random weights (from_scratch)", type(model).__name__)
        return model, {name for name, _ in model.named_parameters()}
    model, info = auto_class.from_pretrained(
        name, config=config, revision=revision, ignore_mismatched_sizes=True, output_loading_info=True,
    )
    return model, set(info["missing_keys"]) | {key[0] for key in info["mismatched_keys"]}


def checkpoint_head_fits(
    name: str, task: Task, labels: list[str] | None, head_names: list[str], fresh_keys: set[str], model: Any,
    *, revision: str | None = None, own_tokenizer: bool = True,
) -> tuple[bool, str]:
    """Whether the checkpoint's task head can be kept as it is, and why (or why not).

    It fits when every head parameter came from the checkpoint at its shape (none in ``fresh_keys``, the
    missing and mismatched keys of the load) and it was trained for the same outputs: the same ``id2label``
    as ``labels`` for classification, the checkpoint's own tokenizer where the head predicts its ids (``task.kept_head_misfit``: CTC).
    """
    params = [n for n, _ in model.named_parameters() if any(n == h or n.startswith(h + ".") for h in head_names)]
    if not params:
        return False, f"the model has no {task.name} head"
    fresh = sorted(p for p in params if p in fresh_keys)
    if fresh:
        return False, f"the checkpoint has no weights of that shape for {', '.join(fresh[:3])}"
    if labels is not None:
        saved = read_config_json(name, revision).get("id2label") or {}
        ordered = [saved.get(str(i), saved.get(i)) for i in range(len(saved))]
        if ordered != list(labels):
            return False, f"its labels {ordered} are not model.labels {list(labels)}"
    misfit = task.kept_head_misfit(own_tokenizer)
    if misfit:
        return False, misfit
    return True, "the checkpoint was trained for the same outputs"


def head_module_names(model: Any, task: Task) -> list[str]:
    """Attribute names of the task head present on ``model`` (empty for tasks that keep their head)."""
    return task.head_names(model)


def load_masked_lm_head(name: str, revision: str | None = None) -> Any | None:
    """The checkpoint's own masked-LM head (BERT's ``cls``, RoBERTa's ``lm_head``, ALBERT's ``predictions``),
    frozen, to score the source objective on a model that replaced it with a task head.

    Loads ``AutoModelForMaskedLM`` once and keeps only the module that maps the encoder's last hidden states
    to vocabulary logits (a tied decoder keeps the pre-trained embedding matrix, a copy). None when the
    checkpoint's head is not one such module (DistilBERT, ELECTRA: several pieces with code between them) or
    it cannot be loaded as a masked LM.
    """
    from transformers import AutoModelForMaskedLM

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name, revision=revision, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("'%s' has no masked-LM head to load (%s)", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    base = model.base_model
    heads = [(n, m) for n, m in model.named_children() if m is not base and any(True for _ in m.parameters())]
    if len(heads) != 1:
        log.warning("the masked-LM head of '%s' is %d modules, not one: its loss is not measured", name, len(heads))
        return None
    head_name, head = heads[0]
    missing = [k for k in info["missing_keys"] if k.startswith(head_name + ".")]
    if missing:  # a head built fresh (a checkpoint saved without it) scores nothing the model knew
        log.warning("'%s' has no trained masked-LM head (missing %s)", name, ", ".join(missing[:3]))
        return None
    head.eval().requires_grad_(False)
    return head
