"""A tiny instruct model for tests: Llama (2 blocks, hidden 32) with a byte-level BPE tokenizer trained
here, ChatML control tokens and a ChatML chat template (as Qwen2.5-Instruct's), plus small instruction data."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen2.5-Instruct renders it (without its default system prompt)."""

COLOURS = {"apple": "red", "banana": "yellow", "grass": "green", "sky": "blue", "snow": "white", "coal": "black"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def training_text() -> list[str]:
    words = [w for pair in COLOURS.items() for w in pair]
    filler = "what colour is the of a and it you are helpful assistant answer in one word question".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words + filler) for _ in range(12)) for _ in range(400)] + ["system user assistant"]


def chat_tokenizer(path: Path, template: str | None = CHATML):
    """Byte-level BPE (vocabulary ~600) with ChatML specials; ``<|im_end|>`` is EOS, ``<|endoftext|>`` pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if template:
        fast.chat_template = template
    fast.save_pretrained(path)
    return fast


def save_tiny_chat_model(path: Path, template: str | None = CHATML) -> Path:
    """Save the tiny Llama causal LM with its chat tokenizer to ``path`` (no template when ``template`` is None)."""
    import torch
    import transformers

    path = Path(path)
    tokenizer = chat_tokenizer(path, template)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path


def write_instruction_data(folder: Path, rows: int = 96) -> dict[str, Path]:
    """jsonl prompt/completion and chat splits: "what colour is X" -> the colour (learnable by a tiny model)."""
    rng = random.Random(2)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for split, n in {"train": rows, "validation": max(rows // 8, 4)}.items():
        pc, chat = folder / f"pc_{split}.jsonl", folder / f"chat_{split}.jsonl"
        with pc.open("w") as f_pc, chat.open("w") as f_chat:
            for _ in range(n):
                a, b = rng.sample(sorted(COLOURS), 2)
                f_pc.write(json.dumps({"prompt": f"what colour is {a}", "completion": COLOURS[a]}) + "\n")
                messages = [
                    {"role": "user", "content": f"what colour is {a}"}, {"role": "assistant", "content": COLOURS[a]},
                    {"role": "user", "content": f"and {b}"}, {"role": "assistant", "content": COLOURS[b]},
                ]
                f_chat.write(json.dumps({"messages": messages}) + "\n")
        out[f"pc_{split}"], out[f"chat_{split}"] = pc, chat
    return out


def save_tiny_t5(path: Path) -> Path:
    """A tiny T5 (2+2 blocks, d_model 32) with a byte-level BPE tokenizer that ends every text with ``</s>``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    model.save_pretrained(path)
    return path


def save_to_datasets_cache(repo_id: str, data_files: dict[str, Path]) -> str:
    """Put jsonl splits into the session's ``datasets`` cache (``$HF_HOME/datasets``) as ``datasets.load_dataset
    (repo_id)`` leaves them after a first load from the hub (``org___name/default/0.0.0/<hash>/``, Arrow files
    and ``dataset_info.json``), so ``load_dataset(repo_id, split=...)`` finds them with ``HF_HUB_OFFLINE=1``.
    Returns ``repo_id``."""
    import shutil
    import tempfile

    import datasets
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    name = camelcase_to_snakecase(name)
    target = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{name}" / "default" / "0.0.0" / ("0" * 16)
    if target.is_dir():  # saved earlier in this session
        return repo_id
    files = datasets.data_files.DataFilesDict.from_patterns({split: [str(path)] for split, path in data_files.items()})
    build = Path(tempfile.mkdtemp(prefix="datasets-build-"))
    builder = Json(cache_dir=str(build), dataset_name=name, config_name="default", data_files=files, hash="0" * 16)
    builder.download_and_prepare()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(build)
    return repo_id


def save_to_disk(folder: Path, data_files: dict[str, Path]) -> Path:
    """jsonl splits saved as a ``datasets.DatasetDict`` with ``save_to_disk`` into ``folder``."""
    import datasets

    splits = {split: datasets.Dataset.from_json(str(path), cache_dir=str(Path(folder).parent / "json-cache")) for split, path in data_files.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return Path(folder)
