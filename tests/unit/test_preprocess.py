"""Tokenization with the checkpoint's tokenizer, label encoding and per-batch padding trim."""

from __future__ import annotations

import numpy as np
import pytest

from engine.preprocessing.labels import IGNORE_INDEX, encode_labels
from engine.preprocessing.text import cached_tokenizer, tokenize_batch, trim_batch


def test_encode_labels_by_name_and_index():
    assert encode_labels(np.array(["b", "a", "c"]), ["a", "b", "c"]).tolist() == [1, 0, 2]
    assert encode_labels(np.array([2, 0]), ["a", "b", "c"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="label 'd' is not one of"):
        encode_labels(np.array(["d"]), ["a", "b", "c"])


def test_tokenize_classification_and_causal_lm(tiny_bert):
    tok = cached_tokenizer(str(tiny_bert))
    batch = {"text": np.array(["apple bread", "disk kernel cpu memory"]), "label": np.array(["food", "tech"])}
    out = tokenize_batch(batch, tokenizer=tok, text_column="text", max_length=16, label_column="label", labels=["food", "tech"])
    assert out["input_ids"].shape == (2, 16) and out["labels"].tolist() == [0, 1]
    assert out["attention_mask"].sum(axis=1).tolist() == [4, 6]  # [CLS] + words + [SEP]
    lm = tokenize_batch(batch, tokenizer=tok, lm_labels=True, text_column="text", max_length=16)
    assert (lm["labels"][0, 4:] == IGNORE_INDEX).all() and (lm["labels"][0, :4] == lm["input_ids"][0, :4]).all()
    trimmed = trim_batch(out)
    assert trimmed["input_ids"].shape == (2, 6) and trimmed["labels"].shape == (2,)
