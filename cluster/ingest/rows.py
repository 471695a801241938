"""What makes a data row bad, checked the same way on a bounded sample before any worker starts and on every
row while Ray Data streams the split (no Ray and no torch here).

A bad row is a null or non-text value in a text column, a null label, a label the job does not know, or a
null audio value. Before the run, the first rows of each file are checked (``cluster.preflight.job``); a bad row
deeper in a large dataset is found while streaming, and the run stops with the file and the row number
(found by re-reading that one file), unless ``data.bad_rows: skip`` drops and counts such rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
PATH_COLUMN = "path"
"""Column Ray Data's readers add with ``include_paths=True``: the file each row came from."""


def open_dataset(files: list[str], fmt: str):
    """A lazy pyarrow dataset over ``files`` (Hugging Face ``datasets``' Arrow stream files included)."""
    from engine.preprocessing.datafiles import open_files

    return open_files(files, fmt)


def iter_column(files: list[str], fmt: str, column: str) -> Iterator[Any]:
    """The values of one column of a split, in file and row order, a batch at a time."""
    for batch in open_dataset(files, fmt).to_batches(columns=[column]):
        yield from batch.column(0).to_pylist()


class BadRowError(ValueError):
    """A data row the job cannot train on; the message names the split, the file and the row."""


@dataclass(frozen=True)
class RowRules:
    """The columns of a split and what each must hold."""

    split: str
    text_columns: tuple[str, ...] = ()
    label_column: str | None = None
    labels: tuple[str, ...] | None = None
    other_columns: tuple[str, ...] = ()
    """Columns that must only be non-null (audio, chat messages, ...)."""
    image_columns: tuple[str, ...] = ()
    """Columns of images (paths, bytes or ``{bytes, path}``) that must open as images (among ``other_columns``)."""
    base_dir: str | None = None
    """The folder relative image paths are resolved against."""
    skip: bool = False
    fmt: str = "parquet"
    files: tuple[str, ...] = ()
    """The split's files, searched for the bad row when the batch does not say its file (the data has a
    column of its own named ``path``, so Ray's path column is not added)."""

    @property
    def known_labels(self) -> frozenset[str]:
        """Label values a row may hold: a class name, or its index (as a number or as text)."""
        labels = self.labels or ()
        return frozenset(labels) | frozenset(str(i) for i in range(len(labels)))

    @property
    def columns(self) -> list[str]:
        return [*self.text_columns, *([self.label_column] if self.label_column else []), *self.other_columns]


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def value_problem(rules: RowRules, column: str, value: Any) -> str | None:
    """Why ``value`` in ``column`` is bad, or None."""
    if _is_null(value):
        return f"column '{column}' is empty (null)"
    if column in rules.image_columns:
        from engine.preprocessing.image import image_problem

        problem = image_problem(value, rules.base_dir)
        return f"column '{column}': {problem}" if problem else None
    if column in rules.text_columns and isinstance(value, (bytes, bytearray)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return f"column '{column}' is not UTF-8 text (byte {exc.start} of the value); save the file as UTF-8"
    elif column in rules.text_columns and not isinstance(value, str):
        return f"column '{column}' holds {type(value).__name__} {str(value)[:40]!r}, not text"
    if column == rules.label_column and rules.labels is not None:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # an integer column with nulls reaches numpy as floats
        if str(value) not in rules.known_labels or isinstance(value, (float, bool)):
            return f"column '{column}' holds the label {str(value)[:40]!r}, which is not one of model.labels {list(rules.labels)}"
    return None


def row_problem(rules: RowRules, row: dict[str, Any]) -> str | None:
    """The first problem of one row, or None."""
    for column in rules.columns:
        problem = value_problem(rules, column, row.get(column))
        if problem:
            return problem
    return None


def first_bad_row(rules: RowRules, columns: dict[str, list[Any]]) -> tuple[int, str] | None:
    """(index, problem) of the first bad row of column-wise values, or None."""
    count = len(next(iter(columns.values()))) if columns else 0
    for index in range(count):
        problem = row_problem(rules, {c: values[index] for c, values in columns.items()})
        if problem:
            return index, problem
    return None


def bad_row_message(rules: RowRules, path: str, row: int | None, problem: str) -> str:
    where = f"row {row}" if row is not None else "a row"
    fix = "Fix or remove the row, or set data.bad_rows: skip to drop and count such rows."
    return f"data.{rules.split}: file '{path}', {where} (counting data rows from 1): {problem}. {fix}"


def column_values(column: Any) -> list[Any]:
    """A pyarrow column as Python values; text that is not valid UTF-8 comes back as bytes (flagged per row)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        return column.cast(pa.binary()).to_pylist()


def locate_in_file(rules: RowRules, path: str) -> tuple[int, str] | None:
    """(1-based row, problem) of the first bad row of one file, read in batches with pyarrow."""
    from engine.preprocessing.datafiles import open_files

    offset = 0
    dataset = open_files([path], rules.fmt)
    present = [c for c in rules.columns if c in dataset.schema.names]
    for batch in dataset.to_batches(columns=present):
        found = first_bad_row(rules, {c: column_values(batch.column(c)) for c in present})
        if found:
            return offset + found[0] + 1, found[1]
        offset += batch.num_rows
    return None


def column_bad_mask(rules: RowRules, column: str, values: np.ndarray) -> np.ndarray:
    """Which values of one batch column are bad; numpy-fast for the usual column types, per value otherwise."""
    kind = values.dtype.kind
    if column in rules.image_columns:  # each image is opened (headers and checksums, not a full decode)
        items = values.tolist()
        return np.fromiter((value_problem(rules, column, v) is not None for v in items), dtype=bool, count=len(items))
    if kind == "U" and (column != rules.label_column or rules.labels is None):
        return np.zeros(len(values), dtype=bool)  # text, no nulls
    if kind in "Uiu" and column not in rules.text_columns:
        if column != rules.label_column or rules.labels is None:
            return np.zeros(len(values), dtype=bool)
        return ~np.isin(values.astype(str), np.array(sorted(rules.known_labels)))
    items = values.tolist()
    if column in rules.text_columns:  # a quick pass that may over-flag (bytes that are UTF-8), then the exact rule
        suspect = np.fromiter((type(v) is not str for v in items), dtype=bool, count=len(items))
    elif column == rules.label_column and rules.labels is not None:
        known = rules.known_labels
        suspect = np.fromiter((not (type(v) is str and v in known) for v in items), dtype=bool, count=len(items))
    else:
        suspect = np.fromiter((_is_null(v) for v in items), dtype=bool, count=len(items))
    for index in np.flatnonzero(suspect):
        suspect[index] = value_problem(rules, column, items[index]) is not None
    return suspect


def check_batch(batch: dict[str, np.ndarray], rules: RowRules, with_paths: bool = True) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` step: raise :class:`BadRowError` at the first bad row (its file and row named),
    or drop bad rows when ``rules.skip``. ``with_paths``: the reader added its path column, removed here."""
    paths = batch.pop(PATH_COLUMN, None) if with_paths else None
    present = [c for c in rules.columns if c in batch]
    if not present:
        return batch
    count = len(batch[present[0]])
    bad = np.zeros(count, dtype=bool)
    for column in present:
        bad |= column_bad_mask(rules, column, np.asarray(batch[column]))
    if not bad.any():
        return batch
    if rules.skip:
        log.warning("data.%s: skipped %d bad row(s) of %d in this block (data.bad_rows: skip)", rules.split, int(bad.sum()), count)
        return {k: v[~bad] for k, v in batch.items()}
    index = int(np.flatnonzero(bad)[0])
    problem = row_problem(rules, {c: batch[c][index] for c in present}) or "bad value"
    candidates = [str(paths[index])] if paths is not None else list(rules.files)
    path, located = candidates[0] if len(candidates) == 1 else "?", None
    for candidate in candidates:
        try:
            located = locate_in_file(rules, candidate)
        except (OSError, ValueError):  # a remote file (Ray names it without its scheme): no row number then
            continue
        if located:
            path = candidate
            break
    raise BadRowError(bad_row_message(rules, path, located[0] if located else None, located[1] if located else problem))


def bad_row_in(exc: BaseException) -> str | None:
    """The :class:`BadRowError` message inside an error Ray raised (a worker's or a Ray Data task's,
    carried as text in its traceback), or None when the failure was something else."""
    import re

    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        match = re.search(r"BadRowError: (data\.\w+: file .*?)(?:\n|$)", str(error))
        if match:
            return match.group(1)
        # Ray Train's WorkerGroupError cuts its message short but keeps each worker's error
        pending += [error.__cause__, error.__context__, *(getattr(error, "worker_failures", None) or {}).values()]
    return None
