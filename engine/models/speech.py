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

    from engine.checkpoints.storage import preprocessing_source

    return AutoFeatureExtractor.from_pretrained(preprocessing_source(name), revision=revision)


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


def normalize_transcript(text: str) -> str:
    """Lower case, letters/digits/apostrophes and single spaces: what a built CTC vocabulary covers."""
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", str(text).lower())).strip()


def build_ctc_vocab(transcripts: list[str], out_dir: str | Path) -> Path:
    """Build a character CTC tokenizer from training transcripts and save it to ``out_dir``.

    Characters are those of :func:`normalize_transcript`, upper-cased as wav2vec2 CTC vocabularies are
    (the tokenizer's ``do_lower_case`` upper-cases its input to match); spaces become the word delimiter ``|``. Written to a temporary folder and renamed into place.
    """
    from transformers import Wav2Vec2CTCTokenizer

    from engine.checkpoints.atomic import atomic_path

    chars = sorted({c for text in transcripts for c in normalize_transcript(text).upper()} - {" "})
    vocab = {**CTC_SPECIALS, **{c: i + len(CTC_SPECIALS) for i, c in enumerate(chars)}}
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        tokenizer = Wav2Vec2CTCTokenizer(str(tmp / "vocab.json"), pad_token="<pad>", unk_token="<unk>", word_delimiter_token="|", do_lower_case=True)
        tokenizer.save_pretrained(tmp)
    log.info("built a CTC vocabulary of %d characters from %d training transcripts: %s", len(chars), len(transcripts), out)
    return out
