"""Speech checkpoints: their feature extractor, their target tokenizer, and the config a task needs.

Everything here reads the checkpoint's own files (``preprocessor_config.json``, the tokenizer or CTC
vocabulary), so preprocessing always matches the checkpoint. :func:`preprocessor_settings` is torch-free
for the driver's checks before any worker starts.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

from engine.config import ASR_TASKS, SPEECH_TASKS
from engine.errors import JobError

log = logging.getLogger(__name__)
PREPROCESSOR_FILE = "preprocessor_config.json"
CTC_SPECIALS = {"<pad>": 0, "<unk>": 1, "|": 2}
"""Special entries of a vocabulary built from transcripts: blank/pad, unknown, word delimiter."""


def preprocessor_settings(name: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's ``preprocessor_config.json`` (sampling rate, normalisation, ...) without torch.

    Raises:
        JobError: the checkpoint ships no feature extractor, so a speech task cannot know its input.
    """
    path = Path(name).expanduser() / PREPROCESSOR_FILE
    try:
        if not path.parent.is_dir():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(name, PREPROCESSOR_FILE, revision=revision))
        return json.loads(path.read_text())
    except Exception as exc:  # missing file or hub error: the same for the user
        raise JobError(
            f"model.name '{name}' has no {PREPROCESSOR_FILE} ({str(exc).splitlines()[0]}); a speech task needs the "
            "checkpoint's feature extractor. Save it with feature_extractor.save_pretrained(folder) beside the model."
        ) from None


@functools.lru_cache(maxsize=4)
def load_feature_extractor(name: str, revision: str | None = None) -> Any:
    """The checkpoint's own feature extractor (one per process and checkpoint)."""
    from transformers import AutoFeatureExtractor

    return AutoFeatureExtractor.from_pretrained(name, revision=revision)


def has_tokenizer(name: str) -> bool:
    """Whether a local folder holds a tokenizer (hub ids are assumed to, and fail loudly when loaded)."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return True
    return any((folder / f).is_file() for f in ("tokenizer_config.json", "vocab.json", "tokenizer.json"))


@functools.lru_cache(maxsize=4)
def load_target_tokenizer(name: str, revision: str | None = None, language: str | None = None, asr_task: str = "transcribe") -> Any:
    """The tokenizer of ASR transcripts: a CTC character vocabulary, or Whisper's with its prefix tokens set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    if hasattr(tokenizer, "set_prefix_tokens"):
        tokenizer.set_prefix_tokens(language=language, task=asr_task)
    return tokenizer


def tokenizer_name(job: Any) -> str:
    """Where the job's target tokenizer lives: ``model.tokenizer`` or the checkpoint."""
    return job.model.tokenizer or job.model.name


def job_tokenizer(job: Any) -> Any:
    """The target tokenizer of an ASR job (None for audio classification)."""
    if job.model.task not in ASR_TASKS:
        return None
    return load_target_tokenizer(tokenizer_name(job), job.model.revision, job.model.language, job.model.asr_task)


def model_config_overrides(job: Any) -> dict[str, Any]:
    """Config attributes a speech task sets on the checkpoint's config before the model is built.

    CTC: the output layer matches the target vocabulary (its size and blank = pad id), with mean loss
    reduction and infinite losses zeroed (clips shorter than their transcript). SpecAugment:
    ``finetune.mask_time_prob`` when the job sets it.
    """
    overrides: dict[str, Any] = {}
    if job.model.task == "ctc":
        tokenizer = job_tokenizer(job)
        overrides.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, ctc_loss_reduction="mean", ctc_zero_infinity=True)
    if job.finetune.mask_time_prob is not None:
        overrides["mask_time_prob"] = job.finetune.mask_time_prob
        if job.model.task == "speech_seq2seq" or "whisper" in job.model.name.lower():
            overrides["apply_spec_augment"] = job.finetune.mask_time_prob > 0
    return overrides


def normalize_transcript(text: str) -> str:
    """Lower case, letters/digits/apostrophes and single spaces: what a built CTC vocabulary covers."""
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", str(text).lower())).strip()


def build_ctc_vocab(transcripts: list[str], out_dir: str | Path) -> Path:
    """Build a character CTC tokenizer from training transcripts and save it to ``out_dir``.

    Characters are those of :func:`normalize_transcript`, upper-cased as wav2vec2 CTC vocabularies are
    (the tokenizer's ``do_lower_case`` upper-cases its input to match); spaces become the word delimiter ``|``. Written to a temporary folder and renamed into place.
    """
    import os
    import shutil

    from transformers import Wav2Vec2CTCTokenizer

    chars = sorted({c for text in transcripts for c in normalize_transcript(text).upper()} - {" "})
    vocab = {**CTC_SPECIALS, **{c: i + len(CTC_SPECIALS) for i, c in enumerate(chars)}}
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp / "vocab.json"), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|", do_lower_case=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("built a CTC vocabulary of %d characters from %d training transcripts: %s", len(chars), len(transcripts), out)
    return out


def job_preprocessors(job: Any) -> tuple[list[Any], int | None]:
    """What an export saves beside the weights (tokenizer, feature extractor), and the model's pad id.

    Text tasks: the checkpoint's tokenizer. Speech tasks: the checkpoint's feature extractor, plus the
    target tokenizer for ASR (CTC: its pad id is the blank).
    """
    from engine.models.loading import load_tokenizer

    if job.model.task not in SPEECH_TASKS:
        tokenizer = load_tokenizer(job.model.name, job.model.revision)
        if job.data.chat_template:  # the export keeps the template it was trained with
            tokenizer.chat_template = job.data.chat_template
        return [tokenizer], tokenizer.pad_token_id
    tokenizer = job_tokenizer(job)
    preprocessors = [load_feature_extractor(job.model.name, job.model.revision)] + ([tokenizer] if tokenizer is not None else [])
    return preprocessors, tokenizer.pad_token_id if job.model.task == "ctc" else None
