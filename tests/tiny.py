"""Tiny models of real architectures and tiny datasets, built offline for tests.

Models are built from ``transformers`` config classes (2 layers, hidden 32), saved with a tokenizer
trained here, and loaded by the engine through the same path a hub id takes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

WORDS = {
    "food": "apple bread cheese soup rice pasta salad butter honey sugar".split(),
    "tech": "disk kernel cpu memory compiler network server byte cache socket".split(),
    "sport": "goal match ball team score coach league pitch race medal".split(),
}
FILLER = "the a of and to in is it that was for on with as by at this".split()


def corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(FILLER + sum(WORDS.values(), [])) for _ in range(12)) for _ in range(300)]


def tiny_tokenizer(path: Path):
    """A word-level tokenizer over the test vocabulary, with BERT-style and causal-LM special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"] + sorted(set(FILLER + sum(WORDS.values(), [])))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        bos_token="<s>", eos_token="</s>",
    )
    fast.save_pretrained(path)
    return fast


def save_tiny_model(kind: str, path: Path, task: str = "sequence_classification", num_labels: int = 3, layers: int = 2) -> Path:
    """Save a tiny ``bert`` or ``llama`` (``layers`` blocks, hidden 32) with its tokenizer to ``path``; ``task``
    ``causal_lm`` keeps the LM head, ``masked_lm`` a BERT's masked-LM head, anything else the bare encoder."""
    import torch
    import transformers

    path = Path(path)
    tokenizer = tiny_tokenizer(path)
    if task == "masked_lm":  # a mask token for the masked-LM objective (the last id: no other id moves)
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
        tokenizer.save_pretrained(path)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64)
    if kind == "bert":
        config = transformers.BertConfig(max_position_embeddings=64, **common)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **common,
        )
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    auto = {"causal_lm": transformers.AutoModelForCausalLM, "masked_lm": transformers.AutoModelForMaskedLM}.get(task, transformers.AutoModel)
    model = auto.from_config(config)
    model.save_pretrained(path)
    return path


def write_topic_data(folder: Path, rows: int = 240, seed: int = 0, files: int = 1) -> dict[str, Path]:
    """Parquet train/validation/test splits of (text, label) where the topic words decide the label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in {"train": rows, "validation": rows // 4, "test": rows // 4}.items():
        labels = [rng.choice(sorted(WORDS)) for _ in range(n)]
        texts = [" ".join(rng.choice(WORDS[y] if rng.random() < 0.4 else FILLER) for _ in range(10)) for y in labels]
        if split == "train" and files > 1:
            (folder / split).mkdir(exist_ok=True)
            step = n // files
            for i in range(files):
                pq.write_table(pa.table({"text": texts[i * step:(i + 1) * step], "label": labels[i * step:(i + 1) * step]}), folder / split / f"part-{i}.parquet")
            out[split] = folder / split
        else:
            pq.write_table(pa.table({"text": texts, "label": labels}), folder / f"{split}.parquet")
            out[split] = folder / f"{split}.parquet"
    return out


def write_lm_data(folder: Path, rows: int = 200) -> dict[str, Path]:
    """jsonl train/validation text for causal LM: repetitive topic sentences a tiny model can learn."""
    import json

    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in {"train": rows, "validation": rows // 4}.items():
        path = folder / f"{split}.jsonl"
        with path.open("w") as f:
            for _ in range(n):
                topic = rng.choice(sorted(WORDS))
                f.write(json.dumps({"text": " ".join(WORDS[topic][:6])}) + "\n")
        out[split] = path
    return out


def save_to_hub_cache(repo_id: str, save: Callable[[Path], Any], revision: str = "0" * 40) -> str:
    """Save a model into ``$HF_HOME/hub`` laid out as ``huggingface_hub`` caches a download
    (``models--org--name/snapshots/<rev>/`` and ``refs/main``), so ``from_pretrained(repo_id)`` finds it offline."""
    import os

    root = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    save(root / "snapshots" / revision)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return repo_id
