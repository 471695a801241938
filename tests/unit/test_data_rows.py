"""The row rules Ray Data applies to every streamed batch: what is bad, what is not, skipping, and the row
number found by re-reading the file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.ingest.rows import BadRowError, RowRules, bad_row_in, check_batch

RULES = RowRules(split="train", text_columns=("text",), label_column="label", labels=("a", "b"), fmt="parquet")


def batch(labels, texts=None, path=None):
    n = len(labels)
    out = {"text": np.array(texts if texts is not None else ["x"] * n, dtype=object), "label": labels}
    if path is not None:
        out["path"] = np.array([str(path)] * n, dtype=object)
    return out


@pytest.mark.parametrize("labels", [np.array([0, 1]), np.array(["0", "b"]), np.array(["a", "b"], dtype=object),
                                    np.array([0, 1], dtype=object), np.array([0.0, 1.0])])
def test_names_and_indices_of_known_labels_pass(labels):
    out = check_batch(batch(labels, path="f.parquet"), RULES)
    assert len(out["label"]) == 2 and "path" not in out


@pytest.mark.parametrize("labels, texts, problem", [
    (np.array([0, 2]), None, "label '2'"),
    (np.array(["a", "c"]), None, "label 'c'"),
    (np.array([0.5, 1.0]), None, "label '0.5'"),
    (np.array(["a", None], dtype=object), None, "'label' is empty"),
    (np.array(["a", "b"], dtype=object), ["x", None], "'text' is empty"),
    (np.array(["a", "b"], dtype=object), ["x", 7], "holds int '7', not text"),
    (np.array(["a", "b"], dtype=object), ["x", b"caf\xe9"], "not UTF-8"),
])
def test_bad_rows_stop_the_batch(labels, texts, problem):
    with pytest.raises(BadRowError, match=problem):
        check_batch(batch(labels, texts), RULES)


def test_skip_drops_only_the_bad_rows_even_when_nulls_turned_ints_into_floats():
    rules = RowRules(split="train", text_columns=("text",), label_column="label", labels=("a", "b"), skip=True)
    out = check_batch(batch(np.array([0.0, np.nan, 1.0]), ["x", "y", "z"]), rules)
    assert out["text"].tolist() == ["x", "z"]


def test_the_row_is_found_in_its_file_and_named_in_ray_errors(tmp_path):
    path = tmp_path / "part-3.parquet"
    texts = [f"t{i}" for i in range(1000)]
    texts[776] = None
    pq.write_table(pa.table({"text": texts, "label": ["a"] * 1000}), path, row_group_size=100)
    with pytest.raises(BadRowError) as info:
        check_batch(batch(np.array(["a"] * 3, dtype=object), ["t775", None, "t777"], path=path), RULES)
    message = str(info.value)
    assert f"file '{path}', row 777 " in message and "'text' is empty" in message
    # Ray Train's WorkerGroupError cuts its message but keeps the worker's error
    class WorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors: ... (Output truncated) ...")
            self.worker_failures = failures

    wrapped = WorkerGroupError({0: RuntimeError(f"ray::SplitCoordinator.get()\ncluster.data_rows.BadRowError: {message}\nmore")})
    assert bad_row_in(wrapped) == message
    assert bad_row_in(RuntimeError("something else")) is None


def test_a_column_of_the_data_named_path_is_kept_and_the_file_searched(tmp_path):
    rules = RowRules(split="train", label_column="label", labels=("a", "b"), other_columns=("path",), fmt="parquet",
                     files=(str(tmp_path / "x.parquet"), str(tmp_path / "y.parquet")))
    pq.write_table(pa.table({"path": ["a.wav", "b.wav"], "label": ["a", "b"]}), tmp_path / "x.parquet")
    pq.write_table(pa.table({"path": ["c.wav", None], "label": ["a", "b"]}), tmp_path / "y.parquet")
    good = check_batch({"path": np.array(["a.wav", "b.wav"], dtype=object), "label": np.array(["a", "b"], dtype=object)}, rules, with_paths=False)
    assert good["path"].tolist() == ["a.wav", "b.wav"]  # the audio column, not Ray's file column
    with pytest.raises(BadRowError, match=r"y\.parquet', row 2 .*'path' is empty"):
        check_batch({"path": np.array(["c.wav", None], dtype=object), "label": np.array(["a", "b"], dtype=object)}, rules, with_paths=False)
